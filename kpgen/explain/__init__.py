"""``kpgen explain`` and ``kpgen status``: rules read into one model (``rules``: the model and
the text readers; ``nft_json``: the kernel's nftables rules as libnftables JSON), a packet
walked through them (``trace``), the answers (``answers``) and their text (``text``)."""
