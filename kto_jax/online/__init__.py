"""Online rounds (sample from the policy, judge, train): the labelling rules so far (``labels``)."""
