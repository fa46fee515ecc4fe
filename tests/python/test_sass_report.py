"""scripts/sass_report.py's loop finder on hand-written instruction lists: the steady loop it counts is
the natural loop of the control-flow graph, whatever nvcc lays out between a loop's header and its back
edge, and without the divergent-warp fallbacks nvcc adds for warp-synchronous operations."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("sass_report", ROOT / "scripts" / "sass_report.py")
sass_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_report)


def program(*lines):
    """(op, args, predicated) per instruction, at addresses 0x00, 0x10, ..."""
    return [(16 * i, op, args, pred) for i, (op, args, pred) in enumerate(lines)]


def addresses(code, indices):
    return [code[i][0] for i in indices]


def test_single_block_loop_is_just_its_block():
    code = program(("MOV", "R0, RZ", False),          # 0x00
                   ("IADD3", "R0, R0, 1", False),     # 0x10 header and latch
                   ("ISETP", "P0, R0, 8", False),     # 0x20
                   ("BRA", "0x10", True),             # 0x30 back edge
                   ("EXIT", "", False))               # 0x40
    assert [addresses(code, l) for l in sass_report.loops(code)] == [[0x10, 0x20, 0x30]]


def test_nested_loops_inner_first_and_inside_outer():
    code = program(("MOV", "R0, RZ", False),          # 0x00
                   ("MOV", "R1, RZ", False),          # 0x10 outer header
                   ("IADD3", "R1, R1, 1", False),     # 0x20 inner header
                   ("BRA", "0x20", True),             # 0x30 inner back edge
                   ("IADD3", "R0, R0, 1", False),     # 0x40
                   ("BRA", "0x10", True),             # 0x50 outer back edge
                   ("EXIT", "", False))
    inner, outer = sass_report.loops(code)
    assert addresses(code, inner) == [0x20, 0x30]
    assert addresses(code, outer) == [0x10, 0x20, 0x30, 0x40, 0x50]


def test_code_laid_out_inside_the_range_but_outside_the_loop_is_not_counted():
    # The loop leaves from 0x20 to a tail laid out at 0x30-0x40, between its header and its back edge.
    code = program(("MOV", "R0, RZ", False),          # 0x00
                   ("IADD3", "R0, R0, 1", False),     # 0x10 header
                   ("BRA", "0x50", True),             # 0x20 stay in the loop, or fall out
                   ("STG", "[R2], R0", False),        # 0x30 after the loop
                   ("EXIT", "", False),               # 0x40
                   ("ISETP", "P1, R0, 8", False),     # 0x50
                   ("BRA", "0x10", True),             # 0x60 back edge
                   ("EXIT", "", False))               # 0x70
    (loop,) = sass_report.loops(code)
    assert addresses(code, loop) == [0x10, 0x20, 0x50, 0x60]


def test_divergent_warp_fallback_is_not_part_of_the_loop():
    # 0x20: BRA.DIV to a copy at 0x70 that rejoins the loop at 0x40 (as nvcc emits around __syncwarp).
    code = program(("MOV", "R0, RZ", False),          # 0x00
                   ("IADD3", "R0, R0, 1", False),     # 0x10 header
                   ("BRA.DIV", "UR4, 0x70", False),   # 0x20
                   ("WARPSYNC", "0xffffffff", False), # 0x30
                   ("HMMA.16816.F32", "R4, R8, R12, R4", False),  # 0x40
                   ("BRA", "0x10", True),             # 0x50 back edge
                   ("EXIT", "", False),               # 0x60
                   ("WARPSYNC.COLLECTIVE", "R9, 0x90", False),    # 0x70 divergent copy
                   ("BRA", "0x40", False))            # 0x80
    (loop,) = sass_report.loops(code)
    assert addresses(code, loop) == [0x10, 0x20, 0x30, 0x40, 0x50]
