"""Scheduling, as pure logic over plain data (no I/O, no torch, time passed in).

Local level (each worker, every step):
  sequence.py       a request's state as the scheduler and engine see it
  local.py          LocalScheduler: one queue per device, step plans, admission by memory, preemption
  local_policy.py   prism (urgency + Moore-Hodgson) and fcfs (round-robin) step policies
  prefill_order.py  Moore-Hodgson ordering and the online prefill speed estimate

Global level (the controller, periodically and on arrivals):
  rates.py             sliding-window request and token rates per model
  cluster.py           ClusterState in, actions (Activate / Evict / Migrate) out
  pressure.py          KV pressure ratio with a compute term, greedy placement, eviction cost
  placement_config.py  settings and memory shared by the placement policies
  placement.py         GlobalScheduler and the prism policy
  baselines.py         static and swap policies
"""
