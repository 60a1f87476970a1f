"""Built-in architectures, all with BatchNorm; input channels and class count configurable."""
from bna_gateway.models.architectures.mobilenetv2 import mobilenetv2
from bna_gateway.models.architectures.resnet import preact_resnet18, resnet18
from bna_gateway.models.architectures.vgg import vgg16_bn

__all__ = ["mobilenetv2", "preact_resnet18", "resnet18", "vgg16_bn"]
