"""Hazardous materials: raw cryptography lives here and nowhere else.

.. danger::
   Everything in this package handles key material or defines a byte format that ciphertexts
   already stored in etcd depend on. Changing a constant, a field order or a length prefix makes
   existing ciphertexts unreadable. Use :mod:`kleidi.service` and the backends instead; only they
   import from here (a ruff rule bans ``cryptography.hazmat`` anywhere else).
"""
