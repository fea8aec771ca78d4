"""Thin adapters that run nemo-minitron's engines inside Megatron-Bridge, NeMo's LLM training loop.

Nothing here is imported by the engines or the `minitron` command: the package needs megatron-bridge, and each
module imports it under ``runtime.absent_imports`` (Bridge imports Transformer Engine at module level).

  model.py      ModelArch -> Bridge GPTModelProvider; pre-wrap hooks (load weights, prune, build the teacher)
  data.py       packed sequences as a Bridge DatasetProvider, in the project trainer's order
  callbacks.py  ImportanceCallback (scores from Bridge's eval passes), HistoryCallback (loss history)
  recipes.py    recipes as functions returning Bridge ConfigContainers
  stages.py     score / prune / distill / correct-teacher through Bridge's pretrain()
  __main__.py   `python -m nemo_minitron.bridge STAGE --recipe FILE [key=value ...]`
"""
