"""Put on PYTHONPATH by tests/integration/test_fail_fast.py: one rank's optimizer step raises.

MDLM_TEST_FAIL_RANK (which rank), MDLM_TEST_FAIL_AT (which call of torch.optim.AdamW.step) and
MDLM_TEST_FAIL_STAMP (a file that gets the time of the failure) come from the test's environment; the trainer has no hook for this."""

import os

if os.environ.get("MDLM_TEST_FAIL_AT") and os.environ.get("RANK", "0") == os.environ.get(
    "MDLM_TEST_FAIL_RANK"
):
    import torch

    _step = torch.optim.AdamW.step
    _calls = [0]

    def _failing_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _calls[0] += 1
        if _calls[0] >= int(os.environ["MDLM_TEST_FAIL_AT"]):
            import time

            with open(os.environ["MDLM_TEST_FAIL_STAMP"], "w") as stamp:
                stamp.write(repr(time.time()))
            raise RuntimeError(f"injected failure on rank {os.environ.get('RANK', '0')}")
        return _step(self, *args, **kwargs)

    torch.optim.AdamW.step = _failing_step  # type: ignore[method-assign]
