"""The one error a notifier raises when a result did not reach its destination.

The outbox catches it, records the message as the delivery's last error and retries with
backoff; anything else escaping a notifier is a bug, not a delivery failure.
"""


class DeliveryError(Exception):
    """A result could not be delivered; the message says where and why (no patient data)."""
