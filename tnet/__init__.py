"""tnet: move files and short messages between machines on one local network.

The package, top to bottom; a module imports only modules below it
(tests/test_layout.py checks it, TYPE_CHECKING imports included):

* ``cli``: the ``tnet`` command, talking to the daemon over the UNIX sockets.
* ``daemon``: the wiring: makes the parts below, opens the four sockets,
  accepts on them, refuses peers beyond the limits, stops cleanly.
* ``commands``: what a local client may ask (``COMMANDS``).
* ``sending``: a send from its walk to its last answer: the attempts, the
  retries across dropped links, a fan-out to several peers.
* ``lssend``: sends and messages to LocalSend devices: which kind a peer
  is, the files' hashes, prepare-upload and an upload per file.
* ``lsdoor``: the LocalSend front door (LOCALSEND=1): the HTTP(S) listener's
  connections and their bounds, the endpoints, the identity and sockets.
* ``lsfind`` / ``lsreceive``: LocalSend discovery (multicast, register, the
  devices seen); the files a LocalSend device sends, as a transfer.
* ``httpconn``: HTTP/1.1 connections in the loop, in clear or over TLS, and
  our own requests (``HttpClient``; ``HttpLink``, kept alive, bodies
  streamed from files).
* ``inbound`` / ``outbound``: the two ends of an exchange with another
  daemon, receiving files into the store, sending them with sendfile.
* ``peers``: what both ends share (deadlines, backpressure, the lingering
  close, ``PeerContext``: what a connection is handed instead of the daemon).
* ``clients``: the local connections: command clients, events subscribers.
* ``recorder``: the history fed from what the peers publish and from the
  answers to sends and messages; the ``history`` request, read a slice
  per turn.
* ``history``: the history file (STATE_DIR/history.jsonl), bounded, append-only.
* ``discovery``: our requests (broadcast, and unicast to PEERS) and the
  answers; whom to answer; the names.
* ``keep``: resume's partial files, kept in TEMP_DIR, and their batches.
* ``store``: TEMP_DIR and FILE_SAVE_DIR on folder descriptors; placing files.
* ``walk``: the files a send names, walked a slice at a time, held compactly.
* ``loop``: the selector, timers, signals, slices of work, ``Conn``.
* ``api``: the local JSON API (§6), pure.
* ``protocol``: the wire format (§2-§5) and the whole exchange state machine
  (``Exchange``, ``EXCHANGE_RULES``: who may send what, when), pure.
* ``tls``: the LocalSend identity in STATE_DIR, TLS contexts, TLS over memory
  BIOs.
* ``http``, ``x509``, ``localsend``: an HTTP/1.1 codec, a certificate maker
  and the LocalSend v2 formats and sessions, pure.
* ``util``: configuration and small helpers.

The LocalSend modules (``lssend`` to ``localsend``, ``tls``, ``x509``) and
``ssl`` load only with LOCALSEND=1: a daemon without it is that much smaller.

A newcomer reads ``protocol`` (the rules), then ``daemon`` and the parts it
names. docs/PROTOCOL.md describes the bytes and says where each rule lives.
"""

__version__ = "0.2.0"
