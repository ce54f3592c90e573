"""The commands of ``python -m trainer``: one module per command, each with ``main(argv) -> int``
(argparse and argv handling only; the work is done by the rooms below). ``trainer/__main__.py``
dispatches to them.
"""
