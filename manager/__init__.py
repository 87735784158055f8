"""The restart manager: decide when to restart Wasm filter instances (paper §3, SPEC §5).

- :mod:`manager.estimate`: pure functions from samples to k, TTL, required/surplus memory and the
  baseline (never reads ground truth).
- :mod:`manager.policies`: the policies (none, fixed, threshold, ratio, oracle) behind one pure
  ``decide(state, new_samples, now, params) -> (decisions, state)``, and ``parse_policy``.

Where the paper is ambiguous, the choices are listed in ``manager/AMBIGUITIES.md``.
"""
