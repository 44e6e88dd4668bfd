import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from napari_sartorius.models.architectures import ChunkedMaskRoIHeads, build_model
from napari_sartorius.models.config import ModelConfig
from napari_sartorius.models.predictor import image_to_tensor
from napari_sartorius.synthetic import make_sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig("mask_rcnn_R_50_FPN", min_size_test=128, max_size_test=256, detections_per_img=60)
    return build_model(config).eval()


def _run(model):
    image = image_to_tensor(make_sample("cort", seed=3, shape=(96, 128)).image)
    with torch.inference_mode():
        return model([image, image.flip(-1)])


def test_chunked_masks_equal_torchvisions_single_pass(model, monkeypatch):
    model.roi_heads.mask_chunk = 7  # 60 detections per image -> 9 passes each
    chunked = _run(model)
    monkeypatch.setattr(ChunkedMaskRoIHeads, "forward", RoIHeads.forward)
    reference = _run(model)
    for a, b in zip(chunked, reference):
        assert len(a["boxes"]) > 7
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["masks"], b["masks"], rtol=1e-5, atol=1e-6)
        assert a["masks"].shape[1:] == (1, 28, 28)


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunks_across_images_equal_one_pass(chunk):
    """Chunks count detections over the whole batch: a chunk may end inside one image and take the start
    of the next; an image without detections in between gets an empty result."""
    from napari_sartorius.models.mask_branch import chunked_mask_probabilities
    from napari_sartorius.models.pooler import RoIPooler

    g = torch.Generator().manual_seed(0)
    feats = {str(i): torch.rand(3, 4, 64 // 2**i, 64 // 2**i, generator=g) for i in range(4)}
    pool = RoIPooler(list(feats), 14, (4, 8, 16, 32), sampling_ratio=2)
    head = torch.nn.Conv2d(4, 6, 3, padding=1)
    predictor = torch.nn.Conv2d(6, 3, 1)
    boxes = []
    for n in (7, 0, 4):
        xy = torch.rand(n, 2, generator=g) * 150
        boxes.append(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 100 + 2], dim=1))
    labels = [torch.randint(1, 3, (len(b),), generator=g) for b in boxes]
    with torch.inference_mode():
        got = chunked_mask_probabilities(pool, head, predictor, feats, boxes, labels, [(256, 256)] * 3,
                                         chunk=chunk, mask_size=14)
        logits = predictor(head(pool(feats, boxes)))
    want = logits[torch.arange(len(logits)), torch.cat(labels)].sigmoid()[:, None].split([7, 0, 4])
    assert [tuple(p.shape) for p in got] == [(7, 1, 14, 14), (0, 1, 14, 14), (4, 1, 14, 14)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_mask_chunk_on_a_gpu_follows_its_free_memory(monkeypatch):
    from napari_sartorius.models.mask_branch import GPU_BYTES_PER_BOX, GPU_CHUNK, mask_chunk_for

    assert mask_chunk_for(torch.device("cpu"), 7) == 7
    assert mask_chunk_for(torch.device("mps"), 7) == 7
    free = {"bytes": 100 * 2**30}  # a large GPU: the most boxes per pass
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 * 2**30))
    assert mask_chunk_for(torch.device("cuda"), 256) == GPU_CHUNK
    assert mask_chunk_for(torch.device("cuda"), GPU_CHUNK * 2) == GPU_CHUNK * 2  # a larger own chunk is kept
    free["bytes"] = 600 * GPU_BYTES_PER_BOX  # in between: what a quarter of the free memory holds
    assert mask_chunk_for(torch.device("cuda:0"), 256) == 600
    free["bytes"] = 2**30  # little free memory: never below the head's own chunk
    assert mask_chunk_for(torch.device("cuda"), 256) == 256
