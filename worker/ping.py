"""The worker's liveness probe: `celery -A worker.ping inspect ping -d gpu0@$HOSTNAME`, through the broker
exactly as the worker reaches it (TLS, ACL user, Sentinel: core/redis_connection.py), without importing torch."""

from core.queue import make_celery
from core.settings import get_settings

app = make_celery(get_settings())
