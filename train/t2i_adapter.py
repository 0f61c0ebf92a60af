r"""Train a T2I-Adapter on a frozen base pipeline; see configs/t2i_adapter.py.

    python train/t2i_adapter.py --config configs/t2i_adapter.py --workdir runs/adapter_edges
    python train/t2i_adapter.py --config configs/t2i_adapter.py:tiny --workdir /tmp/smoke

Re-running the same command resumes from the last checkpoint. The export
(``<workdir>/export``) is a diffusers ``T2IAdapter`` folder. The logic is in
``jaxdiff.training.control``; this file only reads flags.
"""
from jaxdiff.training.control import run_t2i_adapter
from jaxdiff.training.recipes import run_training_main

if __name__ == "__main__":
    run_training_main(run_t2i_adapter)
