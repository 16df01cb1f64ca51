"""Planner: the article's arithmetic as a tool (``moegpt plan``).

Pure functions over a ModelConfig, a hardware entry, a parallel layout, precision and a workload:

    from moegpt.planner.inputs import make_inputs
    from moegpt.planner.plan import plan
    p = plan(make_inputs(preset="gpt4", hardware="a100-40gb", tp=8, pp=16, gpus=128, batch=4096))
    p.decode.tokens_per_s_per_user, p.inference_cost, p.to_dict()  # the JSON of PLANNER.md

Files: hardware (datasheets; this machine's probes are moegpt.hardware) · local (this machine, cached) · presets · inputs (checks) ·
memory · decode (the reference decode roofline) · training · plan (assembles the sections) · table ·
claims + article_* + scenarios (``--article``) · plots (``--plot``) · cli (``add_plan_parser``).
The planner imports neither the engine nor the trainer: ``moegpt plan --measure-efficiency``
times the engine through measurers that the CLI hands it (moegpt.infer.measure).
"""
