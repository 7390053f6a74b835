"""References the engine's network model is tested against (not part of the package).

- :mod:`.fair_share`: a max-min fair-share network of links driven by SimPy, flow by flow;
- :mod:`.flow_reference`: all-to-all exchanges (plain and node-limited, two hops) run as flows
  on it;
- :mod:`.closed_form`: the per-port closed form of one exchange whose senders start at
  different times, call by call (the engine replays per-flow durations instead);
- :mod:`.traffic`: the topologies and traffic matrices the tests share.

How the engine's exchange tables relate to these is described in ``docs/model/network.md``.
"""
