"""Online rounds (sample from the policy, judge, train): the driver (``rounds``), a round's on-disk phases (``phases``), HALOs main's labelling rules (``labels``)."""
