"""The inference models of the training experiments (random weights, eval
mode), for `register_module` and the workers' ``--models``; and their
example inputs (batch 1)."""

import torch


def resnet152():
    import torchvision

    return torchvision.models.resnet152(weights=None).eval()


def inception_v3():
    import torchvision

    return torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()


def bert_base():
    """BERT-base (random weights) on token ids, as bench/paper builds it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig()).eval()


def example(name):
    """Batch-1 inputs of model ``name`` (a tuple of CPU tensors)."""
    g = torch.Generator().manual_seed(1)
    if name == "resnet152":
        return (torch.randn(1, 3, 224, 224, generator=g),)
    if name == "inception_v3":
        return (torch.randn(1, 3, 299, 299, generator=g),)
    if name == "bert_base":
        return (torch.randint(0, 30522, (1, 128), generator=g),)
    raise KeyError(name)


#: Inference model -> (its factory here, the training job of the same model).
MODELS = {
    "resnet152": ("train_models:resnet152", "pipeswitch.train:resnet152_job"),
    "inception_v3": ("train_models:inception_v3", "pipeswitch.train:inception_v3_job"),
    "bert_base": ("train_models:bert_base", "pipeswitch.train:bert_base_job"),
}
