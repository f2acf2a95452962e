"""``kpgen explain`` and ``kpgen status``: rules read into one model (``rules``), a packet
walked through them (``trace``), the answers (``answers``) and their text (``text``)."""
