"""The committed gRPC stubs are exactly what the generator makes from protos/ (never hand-edited)."""

from __future__ import annotations

from pathlib import Path

from serving.protogen import OUTPUT, generate


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path / "gen"): p.read_text() for p in generate(tmp_path / "gen")}
    committed = {
        p.relative_to(OUTPUT): p.read_text() for p in OUTPUT.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(map(str, committed)) == sorted(map(str, fresh)), "run `make protos`"
    drifted = [str(path) for path, text in fresh.items() if committed[path] != text]
    assert not drifted, f"stubs drifted from protos/ ({drifted}); run `make protos`"


def test_stubs_import_from_the_installed_package() -> None:
    from serving.generated.sdserve.v1 import sdserve_pb2, sdserve_pb2_grpc

    service = sdserve_pb2.DESCRIPTOR.services_by_name["ImageGeneration"]
    assert [m.name for m in service.methods] == ["Generate", "GenerateStream", "GetJob", "CancelJob", "ListModels"]
    assert service.methods_by_name["GenerateStream"].server_streaming
    assert callable(sdserve_pb2_grpc.add_ImageGenerationServicer_to_server)
