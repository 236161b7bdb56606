"""micronet-kit: train, compress and score entries to the MicroNet efficient-inference challenge."""
from setuptools import find_packages, setup

DEPLOY = ["onnx>=1.17,<2", "onnxruntime>=1.20,<2"]

setup(
    name="micronet-kit",
    version="0.1.0",
    description="Reference training, compression and scoring for MicroNet challenge entries",
    python_requires=">=3.10",
    # Every package below the project's folders (a hand-written list missed new subpackages).
    packages=find_packages(include=["train", "train.*", "models", "compress", "scoring", "scoring.*", "data", "conf"]),
    package_data={"conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "timm>=1.0,<1.1",
        "numpy>=1.24,<3",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
        "tensorboard>=2.14,<3",
        "safetensors>=0.4,<1",
        "scikit-learn>=1.3,<2",
        "tqdm>=4.66,<5",
        "gensim>=4.4,<5",  # the wikitext_demo task reads the Wikipedia excerpt its wheel ships (4.4: numpy 2)
        "scipy>=1.10,<2",  # train.search.solve's exact solver (scipy.optimize.milp)
        "matplotlib>=3.7,<4",  # the sensitivity heat maps and the comparison's front (PNG)
        "pillow>=9.1",  # the ImageNet loader decodes JPEGs (also what torchvision asks for)
    ],
    extras_require={
        # python -m scoring measure: an entry exported to ONNX (QDQ nodes) and timed on ONNX Runtime
        "deploy": DEPLOY,
        "test": ["pytest>=8,<10", *DEPLOY],
    },
    entry_points={
        "console_scripts": [
            "micronet-train=train.run:main",
            "micronet-score=scoring.__main__:main",
            "micronet-export=scoring.entry.export:main",
        ]
    },
)
