"""Operator webhooks: a transactional outbox delivered with HMAC signatures and bounded retries."""
