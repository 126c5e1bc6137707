"""The built-in tasks, one module each, holding the task's problems, the reward it is
scored with and the builder of its small warm-started model:

    addition     toy addition with worked columns; the `tiny` model (`opo toy-base`)
    scratchpad   toy addition where working is optional; `tiny-scratchpad`

A task imports nothing else from opo: the data registry (opo.data.sources) and the model
resolver (opo.models) import the tasks, never the other way round.
"""
