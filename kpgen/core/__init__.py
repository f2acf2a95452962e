"""The pure core: decoded API objects and node settings in, a typed model and a plan out.

``model`` (frozen dataclasses), ``fields`` (typed reads of untrusted values), ``parse``
(objects to the model, bad ones named and skipped), ``node`` (the node's settings as values),
``plan`` (every behaviour decided once, for both backends), ``names`` (chain and set names).
Nothing here imports another kpgen package.
"""
