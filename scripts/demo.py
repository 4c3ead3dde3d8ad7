"""Temporary demo (random data): builds a CapaBoost-LoRA ViT, prints its parameter report, trains 3 steps."""
import timm
import torch

import capaboost_vision

model = timm.create_model('vit_small_capaboost_lora', img_size=64, num_classes=10)
print(capaboost_vision.parameter_report(model))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))  # random data: this shows the mechanics only
for step in range(3):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    print(f'step {step} loss {loss.item():.4f}')
