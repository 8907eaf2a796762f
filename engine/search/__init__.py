"""Phase 3 of H-Meta-NAS: hardware-constrained adaption (genetic search over a meta-trained super-net).

* :mod:`engine.search.constraints` - budgets (latency / params / MACs) and the cached cost model.
* :mod:`engine.search.pareto` - the non-dominated front of (cost, loss) points.
* :mod:`engine.search.evolution` - Algorithm 1 with injected fitness and cost functions, budget
  sweeps (Pareto fronts) sharing one fitness cache, resumable generation-level state.
* :mod:`engine.search.random_search` - the random-search baseline at the same evaluation budget.
* :mod:`engine.search.adapt` - fitness from a real super-net: mean query loss after the inner loop.
"""
