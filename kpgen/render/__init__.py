"""The plan spelled out as rule text through the templates in ``templates/`` (``text``), and
the difference between two renders as one transaction (``delta``)."""
