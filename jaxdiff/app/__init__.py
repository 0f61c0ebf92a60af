"""The web app behind ``jaxdiff serve`` (Gradio, the optional ``app`` extra).

A thin layer over the library, beside the command line (docs/design.md, Layers):
``state`` (loaded pipeline, adapter folders, compile counter, warm-up, result folders),
``limits`` (uploads checked before decoding), ``jobs`` (personalization runs in the
background), one module per tab (``generate_tab``, ``edit_tab``, ``personalize_tab``) and
``ui`` (the Blocks, queue and launch). Only ``ui`` and the tabs import gradio.
"""
