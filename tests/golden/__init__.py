"""Golden rule files and the cases they are rendered from (see cases.py)."""
