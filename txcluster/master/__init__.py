"""
The master process: it binds the listening socket once, spawns and
supervises the workers, deals connections to them in round-robin mode, and
turns signals into actions.  Nothing here imports the app, klein or
OpenSSL (a test checks it); what the master shares with its workers is in
L{txcluster.wire}.
"""
