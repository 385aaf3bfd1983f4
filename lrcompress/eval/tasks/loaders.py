"""lm-eval ``custom_dataset`` hooks: each task's documents from lrcompress's own readers.

lm-eval calls a hook with the TaskManager's metadata as keyword arguments; lrcompress puts the data
directory there as ``lrcompress_data_dir`` (None: read the hub copy).
"""
from lrcompress.eval.task_data import as_dataset


def arc_easy(lrcompress_data_dir=None, **_):
    return as_dataset("arc_easy", lrcompress_data_dir)


def arc_challenge(lrcompress_data_dir=None, **_):
    return as_dataset("arc_challenge", lrcompress_data_dir)


def piqa(lrcompress_data_dir=None, **_):
    return as_dataset("piqa", lrcompress_data_dir)


def lambada_openai(lrcompress_data_dir=None, **_):
    return as_dataset("lambada_openai", lrcompress_data_dir)
