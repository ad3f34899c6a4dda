"""Reading what kube-apiserver stored in etcd: read-only, paged, from one consistent snapshot.

Two small pieces, shared by ``kleidi scan`` and the other rotation and recovery tools (#14):

* :mod:`kleidi.etcd.reader`: :class:`EtcdReader` connects with the flags kube-apiserver uses
  (endpoints, client certificate, key and CA) and pages through a key range at one pinned revision;
* :mod:`kleidi.etcd.classify`: :func:`classify` tells how one stored value is protected (plaintext,
  aescbc, aesgcm, secretbox, KMS v1, KMS v2 with its key_id) and :func:`resource_of` which resource
  an etcd key belongs to.

Neither ever decrypts, logs or returns a value's content beyond its provider prefix and, for KMS v2,
the EncryptedObject's public fields.
"""

from kleidi.etcd.classify import KeyState, Stored, classify, kleidi_key_version, resource_of
from kleidi.etcd.reader import EtcdOptions, EtcdReader, EtcdUnavailable

__all__ = ["EtcdOptions", "EtcdReader", "EtcdUnavailable", "KeyState", "Stored", "classify", "kleidi_key_version",
           "resource_of"]
