"""Federated and decentralized training of expert modules.

Pure, engine-independent pieces: ``partition`` (IID / Dirichlet / task splits), ``aggregate``
(per-module FedAvg over holders, Fisher-weighted, median, trimmed mean), ``compress`` (codecs with
exact byte counts), ``logit_distill`` (confidence-weighted logit aggregation, KD loss),
``topology``, ``privacy`` (membership inference), ``weights`` (the one encoding of module weights
every engine exchanges) and ``mesh_modules`` (the modules mode on the mesh's Expert and
EntropyRouter). Engines: ``sim`` (in-process, vmapped), ``flower`` (optional Flower engine),
``hivemind`` (optional decentralized engine, a process per peer). ``run`` is one federate run.
"""
