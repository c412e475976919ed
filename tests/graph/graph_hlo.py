import re


def compiled_dot_operand_types(hlo_text: str) -> list[tuple[str, str]]:
    """``(lhs element type, rhs element type)`` of every ``dot`` in compiled HLO text, resolving operand
    names inside their computation (parameters are typed only in the computation's header)."""
    out = []
    for block in hlo_text.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines or not any(" dot(" in l for l in lines):
            continue
        types = {}
        header = lines[0]
        for name, ty in re.findall(r"(\w[\w.\-]*): (\w+)\[", header):
            types[name] = ty
        for l in lines[1:]:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[", l)
            if m:
                types[m.group(1)] = m.group(2)
        for l in lines:
            m = re.search(r" dot\(([^)]*)\)", l)
            if m:
                ops = [o.strip().split(" ")[-1].lstrip("%") for o in m.group(1).split(",")]
                out.append(tuple(types.get(o, "?") for o in ops[:2]))
    return out


def assert_int8_dots(hlo_text: str, expected: int = None) -> None:
    """Every dot of the compiled program is u8 x s8 (and there are ``expected`` of them, when given)."""
    dots = compiled_dot_operand_types(hlo_text)
    assert dots, "no dot in the compiled HLO"
    bad = [d for d in dots if d != ("u8", "s8")]
    assert not bad, f"dots that are not u8 x s8: {bad} (all: {dots})"
    if expected is not None:
        assert len(dots) == expected, dots
