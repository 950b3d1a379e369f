"""Downstream tasks: a dataset in its native layout -> labelled shards with train / validation / test.

::

    items = load_task("speech_commands_v1", "/data/speech_commands_v0.01")  # [Item(path, label, split), ...]
    summary = prepare_task("speech_commands_v1", "/data/speech_commands_v0.01", "shards/spc1")

An adapter reads one dataset's layout and split files into :class:`Item` s; where the
dataset has no official split, items come back with ``split=""`` and
:func:`assign_splits` cuts them 80/10/10 per class (seeded); where it has train / test but
no validation, validation is carved out of train (10 %, per class, seeded). Items that
share a ``group`` (a speaker, a recording location) always land in the same split.
:func:`validate` then refuses what a downstream run would trip on later. :func:`prepare_task`
writes the items with the pre-training shard writer (``<key>.flac`` + ``<key>.json``
holding ``label`` and ``split``) and ``OUT/task.json``, the label set with its indices.

Layouts (SRC is the folder as unpacked; shard ``source`` fields are relative to it):

======================  ==================================================================
speech_commands_v1      ``<word>/<id>_nohash_<n>.wav``, ``validation_list.txt``,
                        ``testing_list.txt``, ``_background_noise_/*.wav``. 12 classes: the
                        10 words, ``_unknown_`` (every other word, all kept) and
                        ``_silence_`` (each background-noise file cut into whole 1 s
                        pieces, the pieces split 80/10/10).
speech_commands_v2      same layout; 35 classes, one per word; background noise unused.
librispeech_100h        ``[LibriSpeech/]train-clean-100/<speaker>/<chapter>/*.flac``;
                        label = speaker; utterances split 80/10/10 per speaker.
voxceleb1               ``iden_split.txt`` (``<1|2|3> idXXXXX/<video>/<utt>.wav``, 1 train,
                        2 validation, 3 test) in SRC or ``SRC/meta/``; audio under
                        ``SRC/wav/`` if that folder exists, else under SRC.
tut_urban_2018          ``meta.csv`` (tab-separated ``filename scene_label identifier
                        source_label``, header row), ``evaluation_setup/fold1_train.csv``
                        and ``fold1_evaluate.csv`` (``filename scene_label``), audio
                        ``audio/*.wav``. evaluate -> test; validation carved from train
                        grouped by ``identifier`` (recording location).
bird_detection          one or more ``*.csv`` in SRC with columns ``itemid,datasetid,
                        hasbird`` (the DCASE 2018 task 3 metadata files) and
                        ``<itemid>.wav`` anywhere under SRC (e.g. ``ff1010bird/wav/``);
                        labels ``bird`` / ``no_bird``; split 80/10/10.
musan                   ``[musan/]{music,speech,noise}/**/*.wav``; split 80/10/10.
nsynth                  ``nsynth-{train,valid,test}/examples.json`` + ``audio/<note>.wav``;
                        label ``instrument_family_str``.
voxforge                ``<language>/<session>/wav/*.wav`` (any audio under the session
                        folder, e.g. ``flac/``), sessions named ``<user>-<date>-<id>`` as
                        in the Voxforge archives; label = language folder; split 80/10/10
                        by speaker: a named ``<user>`` is one speaker across sessions,
                        each ``anonymous-*`` session its own.
folder                  ``<class>/**/<audio>``, or ``{train,validation,test}/<class>/...``
                        (``val``/``valid``/``dev`` and ``eval``/``testing`` accepted).
csv                     SRC is a CSV ``path,label[,split]`` (or a folder holding
                        ``labels.csv``); paths relative to the CSV's folder.
======================  ==================================================================
"""

# The package: core (Item, Task, splitting, checking, the file helpers the adapters share),
# adapters (one function per dataset layout, the TASKS registry, get_task) and prepare
# (load_task / prepare_task / synthetic_task: items -> labelled shards + task.json).
# Every name below was importable from the single module ``cola_ray.data.tasks``.
from cola_ray.data.tasks.adapters import (
    BACKGROUND_NOISE,
    BIRD_LABELS,
    MUSAN_CLASSES,
    NSYNTH_FAMILIES,
    NSYNTH_SPLITS,
    PAPER_CLASSES,
    SILENCE,
    SILENCE_SECONDS,
    SPC_V1_WORDS,
    TASKS,
    UNKNOWN,
    bird_detection,
    class_folders,
    get_task,
    labels_csv,
    librispeech_100h,
    musan,
    nsynth,
    speech_commands_v1,
    speech_commands_v2,
    tut_urban_2018,
    voxceleb1,
    voxforge,
)
from cola_ray.data.tasks.core import (
    FRACTIONS,
    SPLIT_ALIASES,
    SPLITS,
    TASK_FILE,
    TASK_FORMAT,
    VALIDATION_FRACTION,
    Item,
    Task,
    TaskError,
    assign_splits,
    class_counts,
    stratified_split,
    validate,
)
from cola_ray.data.tasks.prepare import (
    load_task,
    prepare_task,
    read_task_info,
    stage_items,
    synthetic_task,
    write_labels_csv,
)

__all__ = [
    "BACKGROUND_NOISE", "BIRD_LABELS", "MUSAN_CLASSES", "NSYNTH_FAMILIES", "NSYNTH_SPLITS", "PAPER_CLASSES",
    "SILENCE", "SILENCE_SECONDS", "SPC_V1_WORDS", "TASKS", "UNKNOWN",
    "bird_detection", "class_folders", "get_task", "labels_csv", "librispeech_100h", "musan", "nsynth",
    "speech_commands_v1", "speech_commands_v2", "tut_urban_2018", "voxceleb1", "voxforge",
    "FRACTIONS", "SPLIT_ALIASES", "SPLITS", "TASK_FILE", "TASK_FORMAT", "VALIDATION_FRACTION",
    "Item", "Task", "TaskError", "assign_splits", "class_counts", "stratified_split", "validate",
    "load_task", "prepare_task", "read_task_info", "stage_items", "synthetic_task", "write_labels_csv",
]
