"""Chaos testing of the failover layer: a local cluster, faults, a workload, a checker."""
