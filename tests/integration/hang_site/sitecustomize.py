"""Put on PYTHONPATH by tests/integration/test_fail_fast.py: one rank stops answering (SIGSTOP) when it
enters its MDLM_TEST_HANG_AT-th torch.distributed.all_reduce (the trainer's own collectives go there),
so its peer waits in that collective until the process-group timeout. Rank from MDLM_TEST_HANG_RANK."""

import os

if os.environ.get("MDLM_TEST_HANG_AT") and os.environ.get("RANK", "0") == os.environ.get(
    "MDLM_TEST_HANG_RANK"
):
    import signal
    import time

    import torch.distributed

    _all_reduce = torch.distributed.all_reduce
    _calls = [0]

    def _hanging_all_reduce(*args, **kwargs):  # type: ignore[no-untyped-def]
        _calls[0] += 1
        if _calls[0] >= int(os.environ["MDLM_TEST_HANG_AT"]):
            with open(os.environ["MDLM_TEST_HANG_STAMP"], "w") as stamp:
                stamp.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return _all_reduce(*args, **kwargs)

    torch.distributed.all_reduce = _hanging_all_reduce
