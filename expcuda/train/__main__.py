"""``python -m expcuda.train``: the ``expcuda train`` command, the form torchrun launches."""

from expcuda.train.cli import main_train

if __name__ == "__main__":
    raise SystemExit(main_train())
