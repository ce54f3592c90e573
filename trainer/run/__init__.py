"""The run room: one training run (the loop and what it needs: steps, checkpoints, process group,
stopping, optimizer, held-out NELBO, metrics log, FLOPs, seeding, preflight, dry run, run settings).

The room of deepspeed and torch.distributed: no room below imports them (the `train` command
above only asks torch.distributed whether a process group is up). Submodules are imported by name
(``from trainer.run.loop import run``); this package re-exports nothing, so importing one
submodule imports no other.
"""
