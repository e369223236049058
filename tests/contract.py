"""The potential contract checks the tests share."""

import numpy as np


async def assert_contract(pot, ctxs, *, allow_zero=False, autoreg=False, rtol=1e-9, atol=1e-12):
    """For each context: ``prefix`` finite (or, with ``allow_zero``, the next checks only
    where it is), ``logw_next`` normalized and consistent with ``prefix`` (genlm-control's
    check), and with ``autoreg`` the autoregressive factorization; then batch consistency."""
    for c in ctxs:
        finite = np.isfinite(await pot.prefix(c))
        assert finite or allow_zero
        if finite:
            w = (await pot.logw_next(c)).weights
            assert abs(np.exp(w).sum() - 1) <= 1e-9
            await pot.assert_logw_next_consistency(c, rtol=rtol, atol=atol)
        if autoreg:
            await pot.assert_autoreg_fact(c, rtol=rtol, atol=atol)
    await pot.assert_batch_consistency(ctxs, rtol=rtol, atol=atol)
