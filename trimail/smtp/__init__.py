"""The SMTP protocol without I/O: replies, addresses, events and the server machine.

Nothing in this package imports trio, apsw, dnspython or socket: bytes go in,
events and reply bytes come out (the h11 model).
"""
