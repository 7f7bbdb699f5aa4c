"""Numerical tolerances shared by `verify`, the demo and the tests (no heavy imports here)."""

# fp32 max |Δlogits| under which two checkpoints count as the same model. Identical weights give
# 0; a real conversion bug (a wrong QKV order, a swapped gate/up) gives differences of order 1.
VERIFY_TOLERANCE = 1e-4
