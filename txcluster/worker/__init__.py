"""
A worker process: it loads the app, connects, runs the startup hooks,
takes its connections (L{txcluster.worker.listen}) and serves until told
to stop; then it drains and runs the shutdown hooks.  Spawned by the
master as C{python -m txcluster.worker}; nothing here imports the master's
side, and what the two share is in L{txcluster.wire}.
"""
