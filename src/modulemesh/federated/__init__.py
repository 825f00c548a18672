"""Federated and decentralized training of expert modules.

Pure, engine-independent pieces: ``partition`` (IID / Dirichlet / task splits), ``aggregate``
(per-module FedAvg over holders, Fisher-weighted, median, trimmed mean), ``compress`` (codecs with
exact byte counts), ``distill`` (confidence-weighted logit aggregation, KD loss), ``topology``,
``privacy`` (membership inference). ``simulate`` runs them in-process; ``flower_app`` is the
optional Flower engine, ``hivemind_engine`` the optional decentralized one (a process per peer).
"""
