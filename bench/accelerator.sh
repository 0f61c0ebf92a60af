#!/usr/bin/env bash
# Every accelerator figure the benchmarks define, in one run (<= 8 minutes on one GPU:
# the steps' limits add up to 475 s),
# written to one JSON file (issue #20, point 4).
#
#   bench/accelerator.sh [--out runs/accelerator.json]      # on the accelerator
#   bench/accelerator.sh --smoke --out /tmp/acc.json         # tiny sizes, any CPU (~12 min
#                                                            # on 2 loaded cores)
#   bench/accelerator.sh --only generate,train               # a subset of the steps
#
# Steps (each under its own time limit; a step that cannot run -- diffusers or torch not
# installed, a benchmark that does not exist yet, a timeout, an error -- is recorded as
# {"missing": why} and printed, and the script goes on):
#   device       jax backend and devices, torch/diffusers versions
#   generate_b1  SD 1.5 bf16, 50 DDIM steps, batch 1: jaxdiff vs diffusers (SDPA) on the
#   generate_b8  same device, batch 8 (bench/sample.py: img/s both sides, compile seconds)
#   recompile    XLA compiles in 2 more calls of the generation program that change only
#                traced values (guidance, seed, prompts, eta, guidance interval): must be 0
#   p2p_b1       null-text inversion + P2P, batch 1 and 8 (bench/edit_speed.py; its tiny
#   p2p_b8       pipeline: it has no SD 1.5 size yet)
#   train        DreamBooth / full fine-tune step, SD 1.5 bf16 + remat, batch 1: s/step and
#                peak device memory of both sides (bench/train_step.py)
#   controlnet_b1  SD 1.5 + one ControlNet, bf16, 50 DDIM steps, batch 1 and 8: img/s and
#   controlnet_b8  seconds with / without the ControlNet, both sides (bench/control_speed.py;
#                  issue #14's target: jaxdiff_control_overhead <= 1.35)
set -u
cd "$(dirname "$0")/.."
OUT=runs/accelerator.json
SMOKE=0
ONLY=""
STEPS_ALL="device generate recompile p2p train controlnet"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="${2:?--out needs a file}"; shift ;;
    --only) ONLY=",${2:?--only needs a list such as generate,train},"; shift ;;
    *) echo "bench/accelerator.sh: unknown argument '$1' (use --smoke, --out FILE," \
            "--only STEP,... from: $STEPS_ALL)" >&2; exit 2 ;;
  esac
  shift
done
for s in $(echo "${ONLY//,/ }"); do
  case " $STEPS_ALL " in *" $s "*) ;; *)
    echo "bench/accelerator.sh: --only: unknown step '$s' (steps: $STEPS_ALL)" >&2; exit 2 ;;
  esac
done
want() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ "$SMOKE" = 1 ]; then
  SIZE=tiny; DTYPE=float32; STEPS=2; BIG=2; REPEATS=1; LIMIT=300
else
  SIZE=sd15; DTYPE=bfloat16; STEPS=50; BIG=8; REPEATS=2; LIMIT=0
fi

# step NAME SECONDS CMD...: runs CMD, keeps its JSON lines, or records why there are none.
step() {
  local name=$1 secs=$2; shift 2
  [ "$LIMIT" -gt 0 ] && secs=$LIMIT
  echo "== $name ($secs s max): $*" >&2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$TMP/$name.out" 2> "$TMP/$name.err"
  local rc=$?
  grep '^{' "$TMP/$name.out" > "$TMP/$name.jsonl" || true
  if [ $rc -ne 0 ] || [ ! -s "$TMP/$name.jsonl" ]; then
    local why
    if [ $rc -eq 124 ]; then why="timed out after $secs s"
    else why="exit $rc: $(grep -v '^\s*$' "$TMP/$name.err" | tail -n 1 | cut -c1-300)"; fi
    echo "   missing: $why" >&2
    "$PY" -c 'import json,sys; print(json.dumps({"missing": sys.argv[1]}))' "$why" \
      >> "$TMP/$name.jsonl"
  fi
  echo "   $((SECONDS - t0)) s" >&2
}

have_reference() {
  "$PY" -c 'import torch, diffusers' 2> /dev/null
}

missing() {  # missing NAME WHY
  echo "== $1" >&2; echo "   missing: $2" >&2
  "$PY" -c 'import json,sys; print(json.dumps({"missing": sys.argv[1]}))' "$2" > "$TMP/$1.jsonl"
}

want device && step device 20 "$PY" -c '
import json, jax
out = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
       "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}
for mod in ("torch", "diffusers"):
    try:
        out[mod] = __import__(mod).__version__
    except ImportError:
        out[mod] = None
print(json.dumps(out))'

if ! want generate; then :
elif have_reference; then
  for b in 1 "$BIG"; do
    step "generate_b$b" 75 "$PY" bench/sample.py --sizes "$SIZE" --samplers ddim \
      --dtype "$DTYPE" --steps "$STEPS" --batch "$b" --repeats "$REPEATS"
  done
else
  missing generate_b1 "torch or diffusers not installed (pip install torch diffusers)"
  missing "generate_b$BIG" "torch or diffusers not installed (pip install torch diffusers)"
fi

want recompile && step recompile 30 "$PY" - <<'EOF'
import json, jax
from jaxdiff import sampling
from jaxdiff.pipeline import init_params
from torchref.scripts import load_script

roof = load_script("bench", "roofline_models")  # the model table alone (light import)
pipe = roof.build("tiny")
params = init_params(pipe)
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)
prog = sampling.generation_program(pipe, "ddim", 2)
ids = jax.numpy.zeros((1, pipe.text_encoder.config.max_position_embeddings), "int32")
shape = (1,) + pipe.latent_shape(roof.MODELS["tiny"][4], roof.MODELS["tiny"][4])
counts = []
for i, (scale, eta) in enumerate([(7.5, 0.0), (3.0, 0.5), (1.0, 1.0)]):
    keys = sampling.sample_keys(i, 1)
    prog(params, ids + i, ids, sampling.initial_noise(keys, shape[1:]), keys,
         jax.numpy.float32(scale), jax.numpy.float32(0.0), jax.numpy.float32(eta),
         sampling.check_interval((0.1 * i, 1.0)), (), None, None, None)
    counts.append(len(compiles))
print(json.dumps({"generate_calls": 3, "compiles_first_call": counts[0],
                  "recompiles": counts[-1] - counts[0]}))
EOF

if ! want p2p; then :
elif have_reference; then
  for b in 1 "$BIG"; do
    step "p2p_b$b" 45 "$PY" bench/edit_speed.py --steps "$STEPS" --batch "$b" \
      --repeats 1
  done
else
  missing p2p_b1 "torch or diffusers not installed (the reference side of bench/edit_speed.py)"
  missing "p2p_b$BIG" "torch or diffusers not installed (the reference side of bench/edit_speed.py)"
fi

if ! want train; then :
elif have_reference; then
  step train 75 "$PY" bench/train_step.py --sizes "$SIZE" --batches 1 --dtype "$DTYPE" \
    --remat --repeats "$REPEATS"
else
  missing train "torch or diffusers not installed (the reference side of bench/train_step.py)"
fi

if ! want controlnet; then :
elif have_reference; then
  for b in 1 "$BIG"; do
    step "controlnet_b$b" 55 "$PY" bench/control_speed.py --sizes "$SIZE" --dtype "$DTYPE" \
      --steps "$STEPS" --batch "$b" --repeats "$REPEATS"
  done
else
  missing controlnet_b1 "torch or diffusers not installed (the reference side of bench/control_speed.py)"
  missing "controlnet_b$BIG" "torch or diffusers not installed (the reference side of bench/control_speed.py)"
fi

mkdir -p "$(dirname "$OUT")"
"$PY" - "$TMP" "$OUT" "$SMOKE" <<'EOF'
import datetime, json, os, sys
tmp, out, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
names = sorted(f[:-6] for f in os.listdir(tmp) if f.endswith(".jsonl"))
res = {n: [json.loads(l) for l in open(os.path.join(tmp, n + ".jsonl")) if l.strip()]
       for n in names}
doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "smoke": smoke, "results": res}
with open(out + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
os.replace(out + ".tmp", out)
print(f"wrote {out}: " + ", ".join(
    f"{n}: {'missing' if any('missing' in r for r in v) else 'ok'}" for n, v in res.items()))
EOF
