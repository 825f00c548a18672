"""Hivemind engine (optional extra ``modulemesh[p2p]``): decentralized peers, no server.

Every peer is its own process (``multiprocessing`` spawn) holding only its own examples. It runs
a ``hivemind.DHT`` bound to 127.0.0.1 (NAT port mapping, AutoNAT and relays off); the first
peer's address bootstraps the others. Each round a peer

1. announces the modules it hosts in the DHT: key ``<run>.hosts.<module>``, subkey = its peer
   ID, value = ``[round, examples]``, expiring after a few minutes;
2. trains them on its own data with the sim engine's public one-peer runners
   (``ModulesRunner.train_local``: the peer's mesh of experts; ``ClientTraining.train_clients``
   for ``fedavg``, where the whole model is the one module ``model``);
3. reads the announcements back and waits until the hosts the shared config implies have
   announced (or the discovery timeout passes, so a vanished peer shrinks the group instead of
   stalling it);
4. averages every module with its co-hosts through a ``hivemind.averaging.DecentralizedAverager``
   (one per module and group size, prefix ``<run>_<module>_<n>``, ``target_group_size =
   min_group_size =`` the hosts found, weight = the peer's example count), i.e. exactly the
   per-module FedAvg of ``aggregate.aggregate_modules``. All of a peer's modules are averaged
   concurrently, so peers sharing several modules cannot wait on each other in different orders.

Peers report per round (over a queue, tensors as ``compress.encode_state`` bytes) their
accuracy, bytes and modules to the parent process, which only records: it builds the same
per-round records as the sim / Flower engines and evaluates the assembled model (each module
FedAvg'd over its hosts with ``aggregate``; in modules mode the mesh of all experts, which it
returns for ``ModuleMesh.save``). It sends the peers nothing but peer 0's address at
the start and the signal to stop at the end.

Bytes are MODELLED (records say ``"bytes_basis": "modelled"``): hivemind exposes no transport
byte counters. The model: hivemind's butterfly all-reduce with equal bandwidths splits a module's vector into n
parts for a group of n peers; a peer sends the (n-1)/n it does not reduce and then its reduced
part to the n-1 others, and receives as much, so it sends and receives ``2 (n-1)/n`` of the
module's tensor bytes (4 per value for fp32, 2 for fp16). Protobuf/libp2p framing and the DHT
announcements (a few hundred bytes per round) are not counted, as the codecs do not count
transport framing either. A peer joining (round 1) is modelled as downloading its modules from
a co-host. Each transfer is counted once, at its sender and at its receiver.
"""

import os

# Only the peers import hivemind: importing it switches torch to the file_system sharing strategy,
# which starts torch_shm_manager, a process that outlives the run by seconds. Tensors here are
# shared only with forked children, which file descriptors handle.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

from .config import check_config, require_extra  # noqa: E402

require_extra()
from .parent import run_hivemind  # noqa: E402

__all__ = ["check_config", "run_hivemind"]
