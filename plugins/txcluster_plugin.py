"""twistd/twist plugin: ``twistd -n txcluster --workers 4``.

Installed into ``twisted/plugins/``; everything is imported lazily so that
``twistd --help`` stays fast.
"""

from twisted.application.service import ServiceMaker

txcluster = ServiceMaker(
    "txcluster",
    "txcluster.tap",
    "Serve a Klein app from N worker processes sharing one port.",
    "txcluster",
)
