# Starting and stopping ranks: local launches for pptk's own checks, the watch on DeepSpeed's launcher, how a
# rank's main() ends, and the environment report.
"""Modules:

- ``ranks``: start N local ranks (gloo on CPU, NCCL on GPUs) for ``pptk verify`` and the tests;
- ``entry``: ``run_main``, one line per failure and a prompt exit for every recipe and command;
- ``watch``: ranks that outlive their launcher stop; survivors name the rank that failed;
- ``env_report``: what this machine runs, against constraints.txt (``pptk env``).

May import: data, deepspeed_compat, errors, logs, failpoints.
"""
