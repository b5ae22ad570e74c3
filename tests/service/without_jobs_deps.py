"""Run a module as ``python -m`` would, with the jobs-only packages unimportable, as in the api image
(which has neither torch nor pandas nor pyarrow):

    python tests/service/without_jobs_deps.py twotower.cli serve ...
"""
import importlib.abc
import runpy
import sys

BLOCKED = {"torch", "pandas", "pyarrow", "matplotlib", "tqdm"}


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
