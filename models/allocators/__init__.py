"""Live-stream allocation policies learnt offline from logged insert / skip decisions.

    from models.allocators.data import read_allocation_log
    from models.allocators.policy import config_for, train_policy
    log = read_allocation_log("workspace/raw/simulator-seed0-users2000-days7")
    policy = train_policy("sl_mgac", log, config_for("sl_mgac", seed=0))
    p_insert = policy(state)          # any AllocationState-like object or state rows

``sl_mgac.py`` is the algorithm (one file, top to bottom); ``greedy.py`` and
``d3rlpy_baselines.py`` the baselines; ``data.py`` the log contract, reward and features;
``policy.py`` train / load by name; ``registry.py`` the MLflow pyfunc.
"""
