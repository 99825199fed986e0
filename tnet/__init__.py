"""tnet: move files and short messages between machines on one local network.

Four main modules: ``protocol`` (the wire format and the local JSON API,
bytes to events and back, no I/O), ``daemon`` (the loop, its four sockets and
the local commands), ``cli`` (the ``tnet`` command) and ``util``
(configuration and small helpers). The daemon outgrew one evening's read, so
four of its responsibilities have modules of their own: ``loop`` (a
connection's socket, buffer and deadline; the timer heap), ``peers`` (the
two ends of an exchange between daemons), ``store`` (placing verified
files in the downloads folder, on folder descriptors) and ``walk`` (the
files of a send, walked a slice at a time). Imports run one way: cli ->
protocol, util; daemon -> peers -> store, walk, loop, protocol, util.
docs/PROTOCOL.md describes the bytes.
"""

__version__ = "0.1.0"
