"Counting the aten operators a call dispatches from Python: each launches a kernel or dispatches on a GPU"
from torch.profiler import profile, ProfilerActivity


def top_level_ops(f) -> int:
    "aten operators called from Python by one call of f (warmed up by one call first)"
    f()
    with profile(activities=[ProfilerActivity.CPU]) as prof: f()
    return sum(1 for e in prof.events() if e.name.startswith('aten::')
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::')))
