"""Workload generators and benchmark drivers; each writes a JSON result with machine,
versions and the command line recorded."""
