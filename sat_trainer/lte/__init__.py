"""LTE (Learn To be Efficient; Zheng et al., NeurIPS 2024, arXiv 2402.06126): train a model so that inference
computes fewer MLP neurons per token.

Each gated MLP's neurons are grouped into equal-size *experts* (:mod:`.experts`), a router per MLP scores every
expert per token (:mod:`.router`), stage 1 trains model and routers with every expert weighted by its score plus
the efficiency and separability losses (:mod:`.losses`), and stage 2 freezes the routers and fine-tunes with only
the experts whose score exceeds the threshold. :func:`apply_lte` / :func:`load_lte` (:mod:`.model`) wire it into a
model; :class:`LTECallback` (:mod:`.callback`) runs both stages in one ``Trainer`` run.
"""
